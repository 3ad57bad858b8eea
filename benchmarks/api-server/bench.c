// bench.c - start-up / RSS / latency harness for the vmm API server options.
// usage: bench NAME BINARY SOCK   (SOCK = "-" for baseline: no server, time to "ready")
// prints one line: name startup_ms startup_cpu_ms ready_ms hwm_kb rss_kb hwm_after_lat_kb lat_med_us lat_min_us lat_p99_us
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <time.h>
#include <poll.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

static double now_us(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static const char REQ[]="GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n";

static int uconnect(const char*p){
  int fd=socket(AF_UNIX,SOCK_STREAM|SOCK_CLOEXEC,0); struct sockaddr_un a={.sun_family=AF_UNIX};
  strncpy(a.sun_path,p,sizeof a.sun_path-1);
  if(connect(fd,(struct sockaddr*)&a,sizeof a)<0){close(fd);return -1;} return fd;}

// send one request, read one full response (Content-Length or chunked). returns status code or -1.
static int ping(int fd){
  if(write(fd,REQ,sizeof REQ-1)!=(ssize_t)(sizeof REQ-1)) return -1;
  char b[16384]; int n=0; char*he=NULL;
  while(!(he=memmem(b,n,"\r\n\r\n",4))){ int r=read(fd,b+n,sizeof b-1-n); if(r<=0) return -1; n+=r; }
  b[n]=0; int code=atoi(b+9); size_t hl=he+4-b;
  char*cl=strcasestr(b,"\r\nContent-Length:");
  if(cl && cl<he){ long want=atol(cl+17); while((long)(n-hl)<want){int r=read(fd,b+n,sizeof b-1-n); if(r<=0) return -1; n+=r;} }
  else { while(!memmem(b+hl,n-hl,"0\r\n\r\n",5)){ int r=read(fd,b+n,sizeof b-1-n); if(r<=0) return -1; n+=r; } } // chunked
  return code;}

static long status_kb(pid_t pid,const char*key){
  char p[64],l[256]; snprintf(p,sizeof p,"/proc/%d/status",pid); FILE*f=fopen(p,"r"); long v=-1; size_t k=strlen(key);
  while(f&&fgets(l,sizeof l,f)){ if(!strncmp(l,key,k)){v=atol(l+k+1);break;} }
  if(f) fclose(f);
  return v;}
#include <dirent.h>
// on-CPU time (ms) summed over all threads still alive, from /proc/PID/task/*/schedstat
static double cpu_ms(pid_t pid){
  char p[64]; snprintf(p,sizeof p,"/proc/%d/task",pid); DIR*d=opendir(p); double ns=0; struct dirent*e;
  while(d&&(e=readdir(d))){ if(e->d_name[0]=='.') continue; char q[320]; snprintf(q,sizeof q,"/proc/%d/task/%s/schedstat",pid,e->d_name);
    FILE*f=fopen(q,"r"); unsigned long long a=0; if(f){ if(fscanf(f,"%llu",&a)!=1) a=0; fclose(f);} ns+=a; }
  if(d) closedir(d);
  return ns/1e6;}
static int cmpd(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}

int main(int argc,char**argv){
  if(argc<4){fprintf(stderr,"usage: %s NAME BINARY SOCK|-\n",argv[0]);return 2;}
  const char*name=argv[1],*bin=argv[2],*sock=argv[3]; int server=strcmp(sock,"-")!=0;
  if(server) unlink(sock);
  int in[2],out[2]; pipe2(in,O_CLOEXEC); pipe2(out,O_CLOEXEC);
  double t0=now_us(); pid_t pid=fork();
  if(pid==0){ dup2(in[0],0); dup2(out[1],1); execl(bin,bin,server?sock:NULL,(char*)NULL); _exit(127); }
  close(in[0]); close(out[1]);
  double tready=-1,tfirst=-1; char ob[256]; int on=0;
  for(;;){
    struct pollfd pf={out[0],POLLIN,0};
    if(tready<0 && poll(&pf,1,server?0:10000)>0){ int r=read(out[0],ob+on,sizeof ob-1-on); if(r>0){on+=r;ob[on]=0; if(strstr(ob,"ready")) tready=now_us();} else if(r==0){fprintf(stderr,"%s: child exited early\n",name);return 1;} }
    if(!server){ if(tready>0) break; continue; }
    int fd=uconnect(sock);
    if(fd>=0){ int c=ping(fd); close(fd); if(c==200){tfirst=now_us();break;} }
    if(now_us()-t0>10e6){fprintf(stderr,"%s: timeout\n",name);kill(pid,9);return 1;}
    usleep(200);
  }
  if(tready<0){ struct pollfd pf={out[0],POLLIN,0}; if(poll(&pf,1,2000)>0){int r=read(out[0],ob+on,sizeof ob-1-on); if(r>0){on+=r;ob[on]=0;}} }
  double su = ((server?tfirst:tready)-t0)/1e3; double cpu0=cpu_ms(pid);
  double lat[200]; int nl=0; long hwm_lat=-1;
  if(server){ // 19 more pings on fresh connections: 20 served in total
    for(int i=0;i<19;i++){ int fd=uconnect(sock); if(fd<0||ping(fd)!=200){fprintf(stderr,"%s: ping %d failed\n",name,i);return 1;} close(fd); }
  }
  usleep(20000);
  long hwm=status_kb(pid,"VmHWM:"), rss=status_kb(pid,"VmRSS:");
  if(server){ int fd=uconnect(sock); ping(fd); // warm connection, then 200 timed keep-alive pings
    for(nl=0;nl<200;nl++){ double a=now_us(); if(ping(fd)!=200){fprintf(stderr,"%s: keepalive ping failed\n",name);return 1;} lat[nl]=now_us()-a; }
    close(fd); hwm_lat=status_kb(pid,"VmHWM:"); qsort(lat,nl,sizeof(double),cmpd); }
  close(in[1]); int st; waitpid(pid,&st,0);
  printf("%s %.3f %.3f %.3f %ld %ld %ld %.1f %.1f %.1f exit=%d\n",name,su,cpu0,tready>0?(tready-t0)/1e3:-1.0,hwm,rss,hwm_lat,
    nl?lat[nl/2]:0,nl?lat[0]:0,nl?lat[nl*99/100]:0,WIFEXITED(st)?WEXITSTATUS(st):-WTERMSIG(st));
  return 0;}
